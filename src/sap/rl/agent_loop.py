"""The Search-R1 agent loop on VeRL's ``verl.experimental.agent_loop`` extension point.

One trajectory, token in and token out. The turn rules are :mod:`sap.agent.protocol`'s, the
functions the eval loop (:mod:`sap.agent.loop`) calls too: :func:`~sap.agent.protocol.read_turn`,
:func:`~sap.agent.protocol.classify`, :func:`~sap.agent.protocol.stop_reason` and
:func:`~sap.agent.protocol.observation`. A test plays one scripted policy through both loops and
checks the same text and the same masks (``tests/rl/test_turn_protocol.py``).

1. the prompt is the dataset's chat (``raw_prompt``: the shared Search-R1 prompt), rendered
   by the model's chat template through VeRL's Continuous Token builder;
2. each turn asks the rollout server for at most ``max_turn_tokens`` new tokens (never more
   than the response budget left), stopping at ``</search>`` or ``</answer>``
   (:data:`sap.rules.tags.STOP_STRINGS`). The generated token ids are appended as they came
   back (mask 1, with their log-probs); they are decoded only to read the action, never
   re-tokenised. When an observation follows, a turn's end-of-sequence token is removed
   (:func:`~sap.agent.protocol.turn_ids`: the eval loop's context never holds it either);
   a trajectory's last turn keeps it;
3. the turn is read (decoded without special tokens) and classified: an answer ends the
   trajectory; a search gets ``information_block(docs)`` from the retriever, an invalid turn
   gets :data:`sap.rules.prompts.INVALID_ACTION_MESSAGE`. Those inserted tokens have mask 0;
4. after ``max_turns`` search rounds one last turn is generated for the answer (Search-R1's
   meaning, shared with sap's eval loop); nothing is inserted after it, so a search written
   there is not run. An observation is cut to at most ``max_obs_tokens`` and to leave room
   for at least one more generated token (the passages are cut, the tags kept; under
   ``obs_cut: head``, the paper's rollout, the first ``max_obs_tokens`` ids are kept);
   one that cannot fit even so ends the trajectory, so it never ends on observation tokens.
   An empty query is not sent; it gets an empty ``<information>`` block (as in the eval loop).

Retrieval failures are retried by :class:`~sap.agent.retrieval.RetrieverClient`; one that
still fails is logged, counted in the trajectory's ``retrieval_failures`` (the reward function
turns it into a metric) and the model gets an empty ``<information>`` block.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import uuid4

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput
from verl.utils.profiler import simple_timer

from sap.agent import protocol
from sap.agent.retrieval import RetrievalError, RetrieverClient, docs_text
from sap.rules.config import RetrieverConfig
from sap.rules.tags import STOP_STRINGS

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("SAP_LOGGING_LEVEL", "WARNING"))


@dataclass
class TrajectoryStats:
    """What happened in one trajectory; carried in ``extra_fields`` to the reward function."""

    turns: int = 0
    """Generated turns."""
    searches: int = 0
    """Searches sent to the retriever (failed ones included)."""
    invalid_actions: int = 0
    retrieval_failures: int = 0
    obs_truncated: int = 0
    """Observations whose passages were cut to ``max_obs_tokens``."""
    budget_exhausted: bool = False
    """The response budget ran out before an answer."""
    answered: bool = False
    queries: list[str] = field(default_factory=list)


def merge_extra_fields(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Carry the rollout server's extra fields across turns: the last turn's value wins,
    except ``min_global_steps`` (the first turn's: the oldest policy version seen)."""
    for key, value in new.items():
        if key == "min_global_steps" and into.get(key) is not None:
            continue
        into[key] = value


def _generation_config(model_path: str):
    """The model's generation config (its end-of-sequence ids), or None."""
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


class SearchAgentLoop(AgentLoopBase):
    """Search-R1 multi-turn rollouts: think, search, read ``<information>``, answer.

    Registered with VeRL by ``ppo/agent_loop.yaml`` (``actor_rollout_ref.rollout.agent.
    agent_loop_config_path``, written by ``sap train-ppo``) under the name ``sap_search`` (``sap.stages.train_ppo.AGENT_NAME``); every
    key of that entry besides ``name`` and ``_target_`` arrives here as a keyword argument.
    (Deliberately not also decorated with VeRL's ``@register``: importing the module would
    then replace the YAML entry, and its settings, in VeRL's registry.)
    """

    def __init__(
        self,
        *args: Any,
        retriever: dict[str, Any] | None = None,
        max_turns: int = 2,
        max_turn_tokens: int = 500,
        max_obs_tokens: int = 500,
        obs_cut: protocol.ObservationCut = "tags",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        # the defaults of every retriever key are RetrieverConfig's (one place)
        self.retriever = RetrieverClient.from_config(RetrieverConfig.model_validate(dict(retriever or {})))
        if max_turns < 0 or max_turn_tokens < 1 or max_obs_tokens < 1 or obs_cut not in ("tags", "head"):
            raise ValueError(f"bad agent loop settings: {max_turns=} {max_turn_tokens=} {max_obs_tokens=} {obs_cut=}")
        self.max_turns = int(max_turns)
        self.max_turn_tokens = int(max_turn_tokens)
        self.max_obs_tokens = int(max_obs_tokens)
        self.obs_cut: protocol.ObservationCut = obs_cut
        self.response_length = int(self.rollout_config.response_length)
        self.eos = protocol.eos_ids(self.tokenizer, _generation_config(self.config.actor_rollout_ref.model.path))

    # -- observations ------------------------------------------------------------------------

    async def _search(self, query: str, stats: TrajectoryStats) -> str:
        stats.searches += 1
        stats.queries.append(query)
        if not query.strip():
            return ""  # nothing to ask: an empty block, not a retrieval failure
        try:
            hits = (await self.retriever.asearch([query]))[0]
        except RetrievalError as e:
            stats.retrieval_failures += 1
            logger.warning("retrieval failed for %r: %s", query[:80], e)
            return ""
        return docs_text(hits)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        messages = list(kwargs["raw_prompt"])
        prompt_ids = await self.ct_build_initial_tokens(messages)
        request_id = uuid4().hex
        budget = self.response_length

        response_ids: list[int] = []
        response_mask: list[int] = []
        logprobs: list[float] | None = []
        extra_fields: dict[str, Any] = {}
        stats = TrajectoryStats()
        timing: dict[str, float] = {}
        num_preempted = 0

        for _ in range(protocol.max_generations(self.max_turns)):
            room = budget - len(response_ids)
            if room <= 0:
                stats.budget_exhausted = True
                break
            params = {
                **sampling_params,
                "stop": list(STOP_STRINGS),
                "include_stop_str_in_output": True,
                "max_tokens": min(self.max_turn_tokens, room),
            }
            with simple_timer("generate_sequences", timing):
                out = await self.server_manager.generate(
                    request_id=request_id, prompt_ids=prompt_ids + response_ids, sampling_params=params
                )
            merge_extra_fields(extra_fields, dict(out.extra_fields or {}))
            num_preempted += max(0, out.num_preempted or 0)
            generated = list(out.token_ids)[: params["max_tokens"]]
            stats.turns += 1
            response_ids += generated
            response_mask += [1] * len(generated)
            if logprobs is not None and out.log_probs:
                logprobs += list(out.log_probs)[: len(generated)]
            elif generated:
                logprobs = None
            if not generated or out.stop_reason in ("aborted", "abort"):
                break

            action = protocol.classify(protocol.read_turn(self.tokenizer, generated))
            stop = protocol.stop_reason(action, stats.turns, self.max_turns)
            stats.answered = stop == "answer"
            if stop is not None:
                break  # an answer, or the final turn: nothing is inserted after it
            with simple_timer("tool_calls", timing):
                docs = ""
                if action.kind == "search":
                    docs = await self._search(action.content, stats)
                else:
                    stats.invalid_actions += 1
                # at least one token of the budget is left for the next turn
                room = budget - len(response_ids) - 1
                obs = protocol.observation(self.tokenizer, action, docs, room, self.max_obs_tokens, cut=self.obs_cut)
            if obs is None:
                stats.budget_exhausted = True
                break  # never end on observation tokens
            stats.obs_truncated += obs.cut
            # the context goes on: the turn's end-of-sequence token is not kept (as in eval)
            end = len(response_ids) - len(generated) + len(protocol.turn_ids(generated, self.eos))
            del response_ids[end:], response_mask[end:]
            if logprobs is not None:
                del logprobs[end:]
            response_ids += obs.ids
            response_mask += [0] * len(obs.ids)
            if logprobs is not None:
                logprobs += [0.0] * len(obs.ids)

        extra_fields.update({"sap_" + k: v for k, v in asdict(stats).items()})
        extra_fields.setdefault("turn_scores", [])
        extra_fields.setdefault("tool_rewards", [])
        observations = sum(1 for i in range(1, len(response_mask)) if response_mask[i] == 0 and response_mask[i - 1] == 1)
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            response_mask=response_mask,
            response_logprobs=logprobs if logprobs else None,
            num_turns=1 + stats.turns + observations,
            metrics=AgentLoopMetrics(
                generate_sequences=timing.get("generate_sequences", 0.0),
                tool_calls=timing.get("tool_calls", 0.0),
                num_preempted=num_preempted,
            ),
            extra_fields=extra_fields,
        )
