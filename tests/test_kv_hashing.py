"""Prefix block keys: pinned golden vectors, chaining, tails, namespaces, cross-process agreement."""
from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

import pytest

from cloudmatrix.kv.hashing import (
    KEY_BYTES,
    block_key,
    namespace,
    prefix_keys,
    root_key,
)

NS = namespace("cmx-tiny", "float32", 4, "fp32")


def test_golden_vectors_pin_the_scheme():
    # If these change, every cache in the world is invalidated: bump SEED's version instead.
    assert NS == "cmx-tiny|fp32|float32|bs4"
    assert root_key(NS).hex() == GOLDEN["root"]
    keys = prefix_keys([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 4, NS)
    assert [k.hex() for k in keys.full] == GOLDEN["full"]
    assert keys.tail.hex() == GOLDEN["tail"]


def test_golden_vectors_of_blocks_with_the_mtp_layer():
    # Blocks of a speculating instance carry the MTP module's KV as one more layer: other bytes,
    # another namespace, so a block of either kind is never read as the other.
    ns = namespace("cmx-tiny", "float32", 4, "fp32", mtp=True)
    assert ns == "cmx-tiny|fp32|float32|bs4|mtp1"
    keys = prefix_keys([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 4, ns)
    assert root_key(ns).hex() == "1412d4297a67d1426354961e421bc74a"
    assert [k.hex() for k in keys.full] == ["1c704cc89adce29ba04bcb11047ce546", "de0f7df2977491f31ea0104a21f8104a"]
    assert keys.tail.hex() == "bd0dd2374011c24d787f68d87e15179c"
    assert not set(keys.all) & set(prefix_keys([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 4, NS).all)


GOLDEN = {
    "root": "9fe711dffcd2d5db5efc938ceef5d6ef",
    "full": ["22ea78631c86c4227aac4ccb2ecf8197", "df908dfb795cd14bb37e37622cfeee49"],
    "tail": "431ebfb102d2135b7dc9049107bfcab5",
}


def test_first_block_key_follows_the_documented_formula():
    """Rebuild block 0's key by hand from the module docstring, independently of the module."""
    ns = NS.encode()
    root = hashlib.blake2b(b"R" + bytes(16) + struct.pack("<I", len(ns)) + ns + struct.pack("<I", 0),
                           digest_size=16, key=b"cloudmatrix-infer/kv-block/v1").digest()
    body = b"F" + root + struct.pack("<I", len(ns)) + ns + struct.pack("<5I", 4, 1, 2, 3, 4)
    expected = hashlib.blake2b(body, digest_size=16, key=b"cloudmatrix-infer/kv-block/v1").digest()
    assert prefix_keys([1, 2, 3, 4], 4, NS).full[0] == expected


def test_chaining_shares_prefixes_and_nothing_else():
    a = prefix_keys(list(range(100, 120)), 4, NS)
    b = prefix_keys(list(range(100, 112)) + [999] + list(range(113, 120)), 4, NS)
    assert a.full[:3] == b.full[:3] and a.full[3] != b.full[3] and a.full[4] != b.full[4]
    assert len(a.full) == 5 and a.tail is None and all(len(k) == KEY_BYTES for k in a.all)


def test_tail_is_never_a_full_block():
    tokens = [7, 8, 9, 10]
    root = root_key(NS)
    assert block_key(root, tokens, NS, tail=True) != block_key(root, tokens, NS)
    keys = prefix_keys([1, 2, 3, 4, 5, 6], 4, NS)
    assert len(keys.full) == 1 and keys.tail == block_key(keys.full[0], [5, 6], NS, tail=True)


def test_namespaces_never_share_keys():
    tokens = list(range(8))
    other_model = namespace("cmx-small", "float32", 4, "fp32")
    other_dtype = namespace("cmx-tiny", "int8", 4, "fp32")
    other_precision = namespace("cmx-tiny", "float32", 4, "int8-pasa")
    keys = {prefix_keys(tokens, 4, ns).full[0] for ns in (NS, other_model, other_dtype, other_precision)}
    assert len(keys) == 4


@pytest.mark.parametrize("bad", [dict(model_id=""), dict(model_id="a|b"), dict(block_size=0), dict(precision=""),
                                 dict(precision="fp32|x")])
def test_bad_namespace_parts_are_named(bad):
    args = dict(model_id="m", kv_dtype="float32", block_size=4, precision="fp32") | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        namespace(**args)


def test_another_process_computes_the_same_keys():
    code = ("from cloudmatrix.kv.hashing import namespace, prefix_keys;"
            "ns = namespace('cmx-tiny', 'float32', 4, 'fp32');"
            "print(','.join(k.hex() for k in prefix_keys(list(range(50)), 4, ns).all))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.strip()
    assert other == ",".join(k.hex() for k in prefix_keys(list(range(50)), 4, NS).all)
