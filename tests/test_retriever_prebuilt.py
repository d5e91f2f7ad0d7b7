"""A prebuilt flat FAISS index used as is (``retriever.index.prebuilt``), as Search-R1's
``e5_Flat.index`` over wiki-18 is: built here the way Search-R1's index builder builds it
(``index_factory(dim, "Flat", METRIC_INNER_PRODUCT)`` over the passages in corpus order), with
the packaged MiniLM standing in for E5."""

from __future__ import annotations

import numpy as np
import pytest

from sap.rules.config import RetrieverIndexConfig
from sap_retriever.corpus import read_passages
from sap_retriever.encoder import Encoder, minilm_config
from sap_retriever.index import RetrieverIndexError, build_index, flat_index_header, load_searcher, read_meta

N = 48


@pytest.mark.slow
def test_prebuilt_flat_index_is_served_as_is(tmp_path, oracle_corpus):
    import faiss

    enc = minilm_config(batch_size=16)
    passages = [p.contents for _, p in zip(range(N), read_passages(oracle_corpus), strict=False)]
    vectors = Encoder(enc).encode_passages(passages).astype("float32")
    index = faiss.index_factory(vectors.shape[1], "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    prebuilt = tmp_path / "e5_Flat.index"
    faiss.write_index(index, str(prebuilt))
    assert flat_index_header(prebuilt) == ("IxFI", vectors.shape[1], N)

    out = tmp_path / "idx"
    cfg = RetrieverIndexConfig(backend="dense", index_types=["flat"], prebuilt=str(prebuilt))
    meta = build_index(oracle_corpus, out, "dense", enc, cfg, limit=N, progress=False)
    assert meta["n_docs"] == N and meta["dim"] == vectors.shape[1] and meta["index_types"] == ["flat"]
    assert not (out / "embeddings").exists()  # nothing was embedded
    assert (out / "faiss_flat.index").stat().st_ino == prebuilt.stat().st_ino  # linked, not copied
    searcher = load_searcher(out)
    rows = searcher.search([passages[7], passages[30]], 3)
    assert [rows[0][0][0].contents, rows[1][0][0].contents] == [passages[7], passages[30]]
    assert read_meta(out)["index"]["prebuilt"] == str(prebuilt)

    with pytest.raises(RetrieverIndexError, match=f"{N} vectors but the corpus has {N - 1} passages"):
        build_index(oracle_corpus, tmp_path / "other", "dense", enc, cfg, limit=N - 1, progress=False)
    hnsw = faiss.IndexHNSWFlat(vectors.shape[1], 8)
    faiss.write_index(hnsw, str(tmp_path / "hnsw.index"))
    with pytest.raises(RetrieverIndexError, match="not a flat FAISS index"):
        flat_index_header(tmp_path / "hnsw.index")
    assert np.isfinite(vectors).all()
