"""The CPU allocator tuning: freed tensor memory is reused, not returned to the OS and faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# 32 training steps of smallcnn at 64 px, batch 16, after four that let the heap grow to its working size; prints
# the page faults of the 32.
STEPS = """
import resource, torch
from classifiers.models import build_classifier
from classifiers.train import DevicePolicy, tune_cpu_allocator
torch.set_num_threads(1)
dev = DevicePolicy(torch.device("cpu"))
print(tune_cpu_allocator())
torch.manual_seed(0)
model = dev.prepare(build_classifier("smallcnn", 12, 1, 64))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for i in range(36):
    if i == 4:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.randn(16, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(16, dtype=torch.long))
    opt.zero_grad()
    loss.backward()
    opt.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(tune: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES",
                                                                                             "LD_PRELOAD")}
    env["NOISEMASK_TUNE_MALLOC"] = tune
    out = subprocess.run([sys.executable, "-c", STEPS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc (Linux with glibc only)")
def test_tuned_allocator_reuses_freed_memory() -> None:
    tuned, faults = _faults("1")
    untuned, faults_default = _faults("0")
    assert tuned and not untuned
    if faults_default < 32 * 100:
        pytest.skip(f"glibc's defaults already reuse memory here ({faults_default} page faults in 32 steps; "
                    "transparent huge pages set to always?): nothing to compare")
    # glibc's defaults map and fault in most steps' activations afresh (thousands of 4 KiB pages a step); tuned,
    # freed blocks are reused and only the heap's occasional growth faults (measured on a 2-core VM: 2,000 to 6,000
    # against 92,000 to 188,000 over the 32 steps; with 16 steps of batch 32 after 2, the margin was too thin:
    # 22,500 against 57,000 once)
    assert faults < faults_default / 5, (faults, faults_default)


@pytest.mark.parametrize(("env", "leave"), [
    ({}, False),
    ({"NOISEMASK_TUNE_MALLOC": "1"}, False),
    ({"NOISEMASK_TUNE_MALLOC": "0"}, True),
    ({"MALLOC_ARENA_MAX": "2"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, True),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, False),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
])
def test_malloc_is_left_alone_when_asked_or_already_tuned(env: dict[str, str], leave: bool) -> None:
    from classifiers.train import leave_malloc_alone

    assert leave_malloc_alone(env) is leave
