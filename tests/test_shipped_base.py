"""The tiny base distft ships: what `distft://tiny-base` loads on every machine."""

from __future__ import annotations

import json
import shutil

import pytest

from distft.models.bundled import (HELDOUT, SHIPPED_FILES, TINY_BASE_DIR, BundledModelError, file_hashes,
                                   heldout_loss, heldout_rows, read_manifest, tiny_base_dir)


def test_the_shipped_base_matches_its_manifest_and_scores_what_it_records():
    manifest = read_manifest()
    assert tiny_base_dir() == TINY_BASE_DIR
    assert file_hashes(TINY_BASE_DIR) == manifest["sha256"] and set(manifest["sha256"]) == set(SHIPPED_FILES)
    # The weights give the held-out loss recorded when they were built (fp32 forward: CPUs agree far closer).
    assert heldout_loss(TINY_BASE_DIR) == pytest.approx(manifest["heldout"]["loss"], rel=1e-4)
    assert len(heldout_rows()) == manifest["heldout"]["docs"] >= 50
    assert manifest["heldout"]["loss"] < 1.5  # it learned its corpus: a random init scores ~ln(vocab) = 6.4
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_BASE_DIR)  # its chat template ships too (chat_template.jinja)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|user|> hi\n<|assistant|>"


def test_the_held_out_corpus_was_never_trained_on():
    from distft.models.bundled import CORPUS_DOCS, HELDOUT_EVERY, bundled_texts
    from distft.models.tiny import generic_corpus

    corpus = generic_corpus(n_docs=CORPUS_DOCS)
    held = heldout_rows()
    assert held == corpus[::HELDOUT_EVERY]  # the recipe's split, reproduced from the generator
    trained = [t for i, t in enumerate(corpus) if i % HELDOUT_EVERY]
    assert not set(trained) & set(held)
    # The two data sources a config can name: the retain default and the replay corpus.
    assert bundled_texts("distft://tiny-base/heldout") == held
    assert bundled_texts("distft://tiny-base/corpus") == trained


def test_distft_tiny_base_names_the_shipped_files_over_an_older_cached_build(tmp_path, monkeypatch):
    from distft.models.loading import resolve_model_path

    stale = tmp_path / "cache" / "tiny-base-v1"  # where an earlier distft built it per machine
    shutil.copytree(TINY_BASE_DIR, stale)
    monkeypatch.setenv("DISTFT_CACHE", str(tmp_path / "cache"))
    assert resolve_model_path("distft://tiny-base") == str(TINY_BASE_DIR)


def test_a_changed_shipped_file_is_refused_by_name(tmp_path, monkeypatch):
    import distft.models.bundled as bundled

    copy = tmp_path / "tiny_base"
    shutil.copytree(TINY_BASE_DIR, copy)
    rows = (copy / HELDOUT).read_text().splitlines()
    (copy / HELDOUT).write_text("\n".join(rows[:-1] + [json.dumps({"text": "edited"})]) + "\n")
    monkeypatch.setattr(bundled, "TINY_BASE_DIR", copy)
    bundled.tiny_base_dir.cache_clear()
    try:
        with pytest.raises(BundledModelError, match=f"{copy / HELDOUT} does not match the sha256"):
            bundled.tiny_base_dir()
        (copy / "model.safetensors").unlink()
        with pytest.raises(BundledModelError, match="model.safetensors is missing. Fix: reinstall distft"):
            bundled.tiny_base_dir()
    finally:
        bundled.tiny_base_dir.cache_clear()
