"""Decode-sized steps on CPU: every pair's expert FFN in moedeploy's own C++ kernel (native.cpp).

The same fused gather-GEMV as the inductor-generated one (compiled.py: each row p reads its own expert's
weights from the bank, no copy, no per-expert calls),

    h[p] = w_in[e_p] @ x[p]        [P, N]    a[p] = silu(gate) * up    [P, I]    y[p] = w_out[e_p] @ a[p]    [P, D]

written for the one thing a decode step needs, reading weights as fast as the memory gives them: inductor's
loop sums each row in one chain of fused multiply-adds and converts bfloat16 weights two instructions per 8
(docs/benchmarks.md: 0.44 of the bandwidth in bfloat16 on an AVX2 CPU); this one keeps two chains per row in
flight and unpacks 16 bfloat16 weights in two (AVX2), 32 in two (AVX-512), or multiplies bfloat16 pairs with
the CPU's own dot-product instruction (AVX512_BF16); `isas()` lists what this CPU runs, best first, and the best
runs.
Roundings are eager torch's (h to the weights' dtype, then silu, then the product); sums are in float32, in a
fixed order per output element, so the bits do not depend on threads, on the other rows of a step or on the
bank's slot order: a layer under an expert budget gives the resident layer's bits (on one CPU: like torch's
own kernels, each instruction set sums in its own order).

int8-quantized experts (quant/formats.py: one scale per row and group of inputs) run the same kernel reading
int8 weights: each group's sum is scaled, then added, in float32 (torch's `_weight_int8pack_mm` reads int8
experts at 6.7 GB/s per core on an AVX2 EPYC, this one at 10.8).

On a CPU with AVX2 (`integer()`) int8 and int4 experts take an integer path instead, as llama.cpp's Q8_0 and Q4
dot products do: each row of inputs is quantized to int8, one scale per 32 inputs (`quantize_inputs` in
quant/formats.py is its reference), and the weight-input products are summed in int32 (AVX512-VNNI: 64 in one
instruction; AVX2: 32 in two, `avx2_int8`); the float32 roundings come per 64-input step and per group. Where it
computes a model's quantized experts (`takes`: SiLU-gated, no biases, groups of 32 or multiples of 64), every step
of theirs runs here, prompts included: int4 in the "plain" layout, which has no other fast CPU kernel; int8, whose
prompts run 1.6-1.8x faster here than in torch's int8 kernel (AVX-512 Xeon). Elsewhere int8 decode steps still
run here, on the float path. Numbers: docs/benchmarks.md.

The source is compiled at first use, once per torch version and source (`torch.utils.cpp_extension`, 15-60 s,
with the C++ compiler inductor needs anyway; one line on stderr says so), into torch's extensions folder
($TORCH_EXTENSIONS_DIR). Where it cannot be built, "auto" keeps the compiled kernel (one warning says why) and
backend="native" is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..dispatch import Plan, pair_rows, row_experts
from ..errors import OptionError
from ..experts import ExpertBank
from .compiled import compiled_supported

SOURCE = Path(__file__).with_name("native.cpp")
FLAGS = ["-O3", "-fopenmp", "-Wno-psabi"]  # OpenMP: ATen's parallel_for is inline and runs on one thread without it;
# psabi: the loop shared by the instruction sets passes their vectors (native.cpp)

_state: dict[str, object] = {}  # "ok": True, or "error": why it could not be built


def _name() -> str:
    """One build per torch version (the library links against torch's C++ ABI) and source: two checkouts of
    moedeploy side by side each keep their own, rather than rebuilding over each other's."""
    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return f"moedeploy_experts_{re.sub(r'[^A-Za-z0-9]', '_', torch.__version__)}_{source}"


def _ninja() -> None:
    """torch's extension builder runs `ninja` from PATH. The `ninja` package moedeploy depends on installs one into
    the environment's scripts folder, which is not on PATH when that environment's Python runs unactivated
    (`.venv/bin/python -m ...`): put it there for this process, where no other ninja is found."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


STALE_LOCK_S = 300  # a build lock older than this was left by a build that was killed (a build takes 15-60 s)


def _lock_is_a_file() -> bool:
    """Whether this torch's extension builder locks a build folder by the mere existence of its `lock` file
    (`FileBaton`, torch < 2.14), rather than by an OS lock on it that dies with its holder (torch 2.14's
    `FileLock`: there the file stays after every build and is not a sign of one)."""
    from torch.utils import cpp_extension

    return "FileBaton" in vars(cpp_extension)


def _clear_stale_lock(folder: Path, stale_after: float = STALE_LOCK_S, poll: float = 1.0) -> None:
    """torch's extension builder (before 2.14) holds `lock` in the build folder while it builds, and every later
    load waits, without limit, for the file to go: a build killed midway (Ctrl-C during the first run) would hang
    every run after it. Wait while another process may be building (the lock younger than `stale_after`), then
    remove a lock that old and say so."""
    lock = folder / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_after:
            break
        time.sleep(min(poll, stale_after - age))
    lock.unlink(missing_ok=True)
    print(f"moedeploy: removed a build lock left {age:.0f} s ago by an interrupted build of its CPU kernel ({lock})",
          file=sys.stderr)


def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call)."""
    if not _state:
        from torch.utils import cpp_extension

        _ninja()
        folder, started = None, time.time()
        try:
            root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
            name = _name()
            folder = Path(root) / name
            folder.mkdir(parents=True, exist_ok=True)
            if _lock_is_a_file():
                _clear_stale_lock(folder)
            if not any(folder.glob("*.so")):
                print("moedeploy: compiling its CPU expert kernel (once per torch version and moedeploy release, "
                      "15-60 s)", file=sys.stderr)
            cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                               build_directory=str(folder), is_python_module=False, verbose=False)
            _state["ok"] = True
        except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as ex:  # no compiler, a failed build:
            # say so, keep the other kernels; a lock file this attempt left (torch < 2.14) would make the next run
            # wait for it: take it away
            lock = folder / "lock" if folder is not None else None
            if lock is not None and _lock_is_a_file() and lock.exists() and lock.stat().st_mtime >= started - 1:
                lock.unlink(missing_ok=True)
            _state["error"] = f"{type(ex).__name__}: {str(ex).strip().splitlines()[-1] if str(ex).strip() else ''}"
    return "ok" in _state


def why_not() -> str:
    return str(_state.get("error", ""))


def isas() -> list[str]:
    """The instruction sets the kernel runs on this CPU, best first (the op's `isa=` takes any of them). Asked of
    the kernel once per process: `integer()` is asked on every step of a quantized layer."""
    if "isas" not in _state:
        _state["isas"] = list(torch.ops.moedeploy.expert_isas()) if available() else []
    return list(_state["isas"])


def _silu_gated(bank) -> bool:
    return _plain_silu(bank.activation) and bank.b_in is None and bank.b_out is None


def _plain_silu(activation) -> bool:
    fn = getattr(activation, "fn", None)
    return activation.gated and activation.clamp is None and type(fn).__name__ in ("SiLU", "SiLUActivation")


INTEGER_ISAS = ("avx512_vnni", "avx2_int8")  # the integer paths, best first


def integer_isa() -> str | None:
    """The kernel's integer path (int8 inputs times int8 / int4 weights) that runs on this CPU, or None. Asked on
    every step of a quantized layer: found once per process."""
    if "integer" not in _state:
        _state["integer"] = next((isa for isa in INTEGER_ISAS if isa in isas()), None)
    return _state["integer"]


def integer() -> bool:
    """Whether one of the kernel's integer paths runs on this CPU (any with AVX2)."""
    return integer_isa() is not None


def native_supported(bank) -> bool:
    """What the kernel computes: the compiled kernel's banks (float32/bfloat16, SiLU-gated, no biases, CPU);
    int8-quantized ones of that kind (quant/formats.py) on the CPU; int4 ones in the "plain" layout on a CPU with
    the integer path, inputs a multiple of 64."""
    spec = getattr(bank, "spec", None)
    if not getattr(bank, "quantized", False):
        return compiled_supported(bank)
    if spec is None or not _silu_gated(bank):
        return False
    if spec.dtype == "int8":
        return bank.q_in.device.type in ("cpu", "meta") and bank.s_in.dtype in (torch.float32, torch.bfloat16)
    return (spec.layout == "plain" and bank.p_in.device.type in ("cpu", "meta") and integer()
            and bank.hidden_size % 64 == 0 and bank.intermediate_size % 64 == 0
            and bank.z_in.dtype in (torch.float32, torch.bfloat16))


def _integer_groups(spec, D: int, I: int) -> bool:
    """Whether both projections' groups suit the integer path: inputs multiples of 64, groups of 32 or multiples
    of 64 (native.cpp `Int8Rows::integer`; int4's groups always do)."""
    return all(K % 64 == 0 and (g == 32 or g % 64 == 0) for K, g in ((D, spec.group(D)), (I, spec.group(I))))


def takes(store, spec) -> bool:
    """Whether the integer path would compute a layer of these experts (store/experts.py `DiskStore`) quantized as
    `spec` (int8 or int4), every step of it: it runs here, the experts are SiLU-gated without biases, the groups
    suit it. The loader then takes the "plain" layout for int4 on the CPU (it has no other fast CPU kernel), and
    int8 prompt steps run here too (1.6-1.8x torch's int8 kernel on a 128-token prompt, docs/benchmarks.md);
    elsewhere quantized experts keep torch's CPU kernels (and int4 its packing)."""
    biased = len(store.read(0)) > 2  # w_in, w_out, then any biases
    return (integer() and _plain_silu(store.activation) and not biased
            and _integer_groups(spec, store.D, store.I))


def every_step(bank) -> bool:
    """Quantized experts on the integer path: the kernel runs every step of theirs, prompts included, not decode
    steps alone."""
    spec = getattr(bank, "spec", None)  # None: not quantized here, or pre-quantized (MXFP4, FP8)
    return (spec is not None and native_supported(bank) and integer()
            and _integer_groups(spec, bank.hidden_size, bank.intermediate_size))


def check(bank: ExpertBank) -> None:
    """backend="native", asked for by name: refuse a bank it does not compute or a kernel that did not build."""
    if not native_supported(bank):
        raise OptionError("backend 'native' needs SiLU-gated float32/bfloat16 experts without biases on the CPU, "
                          "int8-quantized ones, or int4 ones on a CPU with AVX2; use backend='auto' for "
                          "this model")
    if not available():
        raise OptionError(f"backend 'native' could not be built ({why_not()}); it needs a C++ compiler with OpenMP "
                          "(g++ on PATH; ninja comes with moedeploy; torch.compile needs the compiler too); "
                          "use backend='auto'")


def warn_unavailable() -> None:
    """Once per process, where "auto" wanted the kernel and it could not be built."""
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"moedeploy's CPU expert kernel could not be built ({why_not()}); decode steps use the "
                      "torch.compile kernel instead", RuntimeWarning, stacklevel=3)


def _run(rows: Tensor, expert: Tensor, bank) -> Tensor:
    if not available():
        raise OptionError(f"moedeploy's CPU expert kernel could not be built ({why_not()}); use backend='auto'")
    rows, expert = rows.contiguous(), expert.long().contiguous()
    if getattr(bank, "quantized", False) and bank.spec.dtype == "int4":
        return torch.ops.moedeploy.expert_ffn_int4(rows, expert, bank.p_in, bank.z_in, bank.p_out, bank.z_out)
    if getattr(bank, "quantized", False):
        return torch.ops.moedeploy.expert_ffn_int8(rows, expert, bank.q_in, bank.s_in, bank.q_out, bank.s_out)
    return torch.ops.moedeploy.expert_ffn(rows, expert, bank.w_in.contiguous(), bank.w_out.contiguous())


def native_pairs(x: Tensor, ids: Tensor, bank: ExpertBank) -> Tensor:
    """x [T, D], ids [T, K] -> pairs [T*K, D] in (token, k) order, with no plan (a decode step's dispatch)."""
    return _run(*pair_rows(x, ids), bank)


def native_experts(x_sorted: Tensor, p: Plan, bank: ExpertBank) -> Tensor:
    if x_sorted.shape[0] == 0:
        return x_sorted.new_empty(0, bank.hidden_size)
    return _run(x_sorted, row_experts(p, x_sorted.shape[0]), bank)
