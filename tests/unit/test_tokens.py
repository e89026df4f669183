"""Prompt hashing shared by router and engine."""

from __future__ import annotations

import pytest

from kvpilot.tokens import block_hashes, block_text, render_chat, segment_block_hashes, segments_text, token_count


def test_block_hashes_are_prefix_chained() -> None:
    a = block_text(1, 64) + block_text(2, 64)
    b = block_text(1, 64) + block_text(3, 64)
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 8 and ha[:4] == hb[:4] and all(x != y for x, y in zip(ha[4:], hb[4:], strict=True))
    # Same block content at a different position hashes differently (the parent is part of it).
    assert block_hashes(block_text(2, 64), 16)[0] != ha[4]
    assert block_hashes(a, 16, max_blocks=3) == ha[:3]


def test_partial_block_is_not_hashed() -> None:
    assert len(block_hashes("x" * (16 * 4 * 2 + 7), 16)) == 2
    assert token_count("x" * 9) == 3


def test_segment_hashes_agree_on_shared_segments() -> None:
    a = segment_block_hashes([5, 6, 7], 512, 1536, 16)
    b = segment_block_hashes([5, 6, 9], 512, 1536, 16)
    assert len(a) == 96 and a[:64] == b[:64] and a[64] != b[64]
    coarse = segment_block_hashes([5, 6, 7, 8], 512, 2048, 1024)
    assert len(coarse) == 2
    with pytest.raises(ValueError, match="divide"):
        segment_block_hashes([1], 512, 512, 48)


def test_segments_text_has_exact_length() -> None:
    text = segments_text([1, 2], 512, 700)
    assert token_count(text) == 700 and text.startswith(block_text(1, 512))


def test_render_chat_is_stable() -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert render_chat(msgs) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
