"""Freed memory kept in the process while training (train/memory.py): a block freed and allocated again faults in
no new pages inside ``retained_memory``, and after it malloc gives memory back again.

Each case runs in a fresh interpreter: malloc's settings are process-wide."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc settings are glibc's")

# 64 MiB, above the largest block glibc ever serves from its heap by default (32 MiB): mmap'd afresh each time
_FAULTS_PER_BLOCK = """
import json, resource, sys
import torch
from mixbits.train.memory import retained_memory

def faults_per_block():
    for _ in range(3):  # the first blocks fault in whatever happens (the heap grows to hold two of them)
        torch.ones(16 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.ones(16 << 20)  # allocated, written, freed
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4

if sys.argv[1] == "retain":
    with retained_memory() as retained:
        faults = faults_per_block()
else:
    retained, faults = False, faults_per_block()
print(json.dumps({"retained": retained, "faults": faults}))
"""

# 256 MiB allocated and freed inside retained_memory: kept in the process there, given back when the block ends
_RESIDENT = """
import json, os, torch
from mixbits.train.memory import retained_memory

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

base = resident()
with retained_memory() as retained:
    blocks = [torch.ones(16 << 20) for _ in range(4)]  # 4 x 64 MiB, written, then freed
    del blocks
    inside = resident() - base
print(json.dumps({"retained": retained, "inside": inside >> 20, "after": (resident() - base) >> 20}))
"""


def _pages_per_block() -> int:
    return (64 << 20) // os.sysconf("SC_PAGE_SIZE")  # inside a test: no os.sysconf where the module is skipped


def _run_json(code: str, *args: str, **env: str) -> dict:
    """The JSON line ``code`` prints last, run in a fresh interpreter with ``env`` added to the environment."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_retained_memory_is_reused_without_page_faults():
    default = _run_json(_FAULTS_PER_BLOCK, "default")
    retained = _run_json(_FAULTS_PER_BLOCK, "retain")
    assert not default["retained"] and default["faults"] > _pages_per_block() / 2  # the test sees real faults
    assert retained["retained"] and retained["faults"] < _pages_per_block() / 100


def test_freed_memory_is_given_back_when_the_block_ends():
    held = _run_json(_RESIDENT)
    assert held["retained"] and held["inside"] >= 200  # MiB kept while training
    assert held["after"] < 32  # malloc's defaults back and the heap trimmed


def test_environment_pin_leaves_malloc_alone():
    pinned = _run_json(_FAULTS_PER_BLOCK, "retain", MIXBITS_RETAIN_MEMORY="0")
    assert not pinned["retained"] and pinned["faults"] > _pages_per_block() / 2


def test_fit_retains_freed_memory_while_it_trains_on_cpu_with_the_same_numbers():
    code = """
import json
import torch
from mixbits.quant import QConv2d
from mixbits.train import TrainConfig, fit
from mixbits.train.memory import memory_retained

class Spy(torch.nn.Module):  # records whether freed memory is kept while fit runs the model
    seen = []

    def forward(self, x):
        Spy.seen.append(memory_retained())
        return x

torch.manual_seed(0)
model = torch.nn.Sequential(QConv2d(1, 4, 3, w_bits=(4,), a_bits=(4,)), Spy(), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 6 * 6, 2))
data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,))) for _ in range(4)]
history = fit(model, data, TrainConfig(epochs=2, lr=0.1, compile=False), progress=False).history
print(json.dumps({"retained": all(Spy.seen), "after": memory_retained(),
                  "losses": [epoch["train_loss"] for epoch in history]}))
"""
    kept, default = _run_json(code), _run_json(code, MIXBITS_RETAIN_MEMORY="0")
    assert kept["retained"] and not default["retained"]
    assert not kept["after"]  # fit returned: malloc's defaults are back
    assert kept["losses"] == default["losses"]  # where memory comes from changes no number
