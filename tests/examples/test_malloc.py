"""The training example's malloc settings (`examples/_malloc.py`): a large block freed
and allocated again is reused as it is, without faulting its pages in again."""

import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
# A block as large as the example's per-step XLA buffer (56 MiB), freed and allocated
# again; prints the page faults of the second allocation's writes.
PROGRAM = """
import ctypes, ctypes.util, resource, sys
sys.path.insert(0, sys.argv[1])
from _malloc import keep_freed_memory
if sys.argv[2] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 56 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 2, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(EXAMPLES), mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(result.stdout)


def test_a_freed_block_is_reused_without_page_faults():
    pages = (56 << 20) // 4096
    # glibc's defaults: the block goes back to the kernel, every page faults again.
    assert page_faults("default") > pages // 2
    assert page_faults("keep") < pages // 100
