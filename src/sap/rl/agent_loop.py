"""The Search-R1 agent loop on VeRL's ``verl.experimental.agent_loop`` extension point.

One trajectory, token in and token out, the way sap's eval loop plays it in text:

1. the prompt is the dataset's chat (``raw_prompt``: the shared Search-R1 prompt), rendered
   by the model's chat template through VeRL's Continuous Token builder;
2. each turn asks the rollout server for at most ``max_turn_tokens`` new tokens (never more
   than the response budget left), stopping at ``</search>`` or ``</answer>``
   (:data:`sap.rules.tags.STOP_STRINGS`). The generated token ids are appended as they came
   back (mask 1, with their log-probs); they are decoded only to read the action, never
   re-tokenised;
3. the turn is read with :func:`sap.rules.tags.parse_action`: an answer ends the trajectory;
   a search gets ``information_block(docs)`` from the retriever, an invalid turn gets
   :data:`sap.rules.prompts.INVALID_ACTION_MESSAGE`. Those inserted tokens have mask 0;
4. after ``max_turns`` search rounds one last turn is generated for the answer (Search-R1's
   meaning, shared with sap's eval loop); nothing is inserted after it, so a search written
   there is not run. An observation that would leave no room for another generated token is
   not inserted either, so a trajectory never ends on observation tokens. An empty query is not sent; it gets an empty
   ``<information>`` block (as in the eval loop).

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

from sap.agent.retrieval import RetrievalError, RetrieverClient, docs_text
from sap.rules.prompts import INVALID_ACTION_MESSAGE, information_block
from sap.rules.tags import STOP_STRINGS, parse_action

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
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        retriever = dict(retriever or {})
        self.retriever = RetrieverClient(
            url=str(retriever.get("url", "http://127.0.0.1:8000")),
            topk=int(retriever.get("topk", 3)),
            timeout_s=float(retriever.get("timeout_s", 30.0)),
            max_retries=int(retriever.get("max_retries", 3)),
            backoff_s=float(retriever.get("backoff_s", 0.5)),
        )
        if max_turns < 0 or max_turn_tokens < 1 or max_obs_tokens < 1:
            raise ValueError(f"bad agent loop limits: {max_turns=} {max_turn_tokens=} {max_obs_tokens=}")
        self.max_turns = int(max_turns)
        self.max_turn_tokens = int(max_turn_tokens)
        self.max_obs_tokens = int(max_obs_tokens)
        self.response_length = int(self.rollout_config.response_length)

    # -- observations ------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def observation_ids(self, docs: str, stats: TrajectoryStats) -> list[int]:
        """Token ids of ``information_block(docs)``; over ``max_obs_tokens`` the passages are cut
        and the ``<information>`` tags kept."""
        ids = self._encode(information_block(docs))
        if len(ids) <= self.max_obs_tokens:
            return ids
        stats.obs_truncated += 1
        block = information_block("\x00")
        head, tail = block.split("\x00")
        head_ids, tail_ids = self._encode(head), self._encode(tail)
        room = max(0, self.max_obs_tokens - len(head_ids) - len(tail_ids))
        return head_ids + self._encode(docs.strip())[:room] + tail_ids

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

        for turn in range(self.max_turns + 1):
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

            action = parse_action(self.tokenizer.decode(generated, skip_special_tokens=True))
            if action.kind == "answer":
                stats.answered = True
                break
            if turn == self.max_turns:
                break  # the final turn: nothing is inserted after it
            with simple_timer("tool_calls", timing):
                if action.kind == "search":
                    obs = self.observation_ids(await self._search(action.content, stats), stats)
                else:
                    stats.invalid_actions += 1
                    obs = self._encode(INVALID_ACTION_MESSAGE)
            if len(response_ids) + len(obs) >= budget:
                stats.budget_exhausted = True
                break  # never end on observation tokens
            response_ids += obs
            response_mask += [0] * len(obs)
            if logprobs is not None:
                logprobs += [0.0] * len(obs)

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
