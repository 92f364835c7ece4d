"""The compiled CUDA extension on a machine without a GPU (CI builds it first with
scripts/build_cuda_ext.sh): it loads, registers the expected op schemas, its fake functions
give the right shapes, and CPU tensors get a clear error. Plus the build switches of
csrc/build.py, which need no compiled code."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ei_kernels
from ei_kernels import backends, mor_linear

ROOT = Path(__file__).resolve().parent.parent
INFO = ei_kernels.cuda_extension_info()
# The sm_90a kernels (csrc/sm90_*.cu): trapping stubs in every other image.
HOPPER_KERNELS = ("ext_gemm_kernel", "routed_gemm_kernel", "routed_dgrad_kernel")

needs_extension = [
    pytest.mark.cuda_ext,
    pytest.mark.skipif(not INFO["built"], reason=f"the CUDA extension is not built: {INFO['reason']}"),
]

FWD_SCHEMA = (
    "ei_kernels_cuda::mor_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
    "Tensor lora_b, Tensor? router_weight, Tensor? router_bias, int[] ranks, float[] scalings, "
    "bool bypass, int groups) -> (Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "ei_kernels_cuda::mor_bwd(Tensor dy, Tensor x, Tensor probs, Tensor weight, Tensor lora_a, "
    "Tensor lora_b, Tensor? router_weight, Tensor? shrink, int[] ranks, float[] scalings, "
    "bool bypass, int groups, bool compute_dx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
RANKS, SCALINGS = [2, 4, 8], [2.0, 2.0, 2.0]

# (groups, router, bypass, bias)
CONFIGS = [
    pytest.param(1, True, True, True, id="default"),
    pytest.param(3, True, True, True, id="groups3"),
    pytest.param(1, True, False, False, id="no-bypass-no-bias"),
    pytest.param(1, False, False, True, id="plain-lora"),
]


def _inputs(n, k, o, groups, router, bypass, bias, dtype=torch.bfloat16, device="cpu"):
    r, L = sum(RANKS), len(RANKS) + int(bypass)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float32).to(dtype=dtype, device=device)

    return dict(
        x=t(n, k), weight=t(o, k), bias=t(o) if bias else None, lora_a=t(groups * r, k),
        lora_b=t(o, r), router_weight=t(groups * L, k) if router else None,
        router_bias=t(groups * L) if router else None,
    )


def _fwd_args(inp, bypass, groups):
    return (*inp.values(), RANKS, SCALINGS, bypass, groups)


def _bwd_args(inp, bypass, groups, compute_dx, logits, keep_shrink=False):
    x = inp["x"]
    dy = x.new_empty((x.shape[0], inp["weight"].shape[0]))
    probs = x.new_empty((x.shape[0], logits), dtype=torch.float32)
    shrink = (x.new_empty((x.shape[0], inp["lora_a"].shape[0] + logits), dtype=torch.float32)
              if keep_shrink else None)
    return (dy, x, probs, inp["weight"], inp["lora_a"], inp["lora_b"], inp["router_weight"],
            shrink, RANKS, SCALINGS, bypass, groups, compute_dx)


def test_info_has_the_documented_keys():
    assert set(INFO) == {"built", "loaded", "path", "reason", "sm90_gemm"}
    assert (INFO["reason"] is None) == INFO["loaded"]
    assert (INFO["sm90_gemm"] is None) == (not INFO["loaded"])


def test_backend_cuda_on_cpu_tensors_is_refused_before_the_op():
    assert "needs CUDA tensors" in backends.unavailable_reason("cuda", "cpu")
    inp = _inputs(4, 16, 12, 1, True, True, True, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        mor_linear(*inp.values(), ranks=RANKS, scalings=SCALINGS, backend="cuda")


def _release(tool: str) -> tuple[int, int]:
    """(major, minor) of a CUDA tool's `--version` ("... release 13.0, V13.0.88")."""
    import re
    import subprocess

    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def _cuobjdump() -> str:
    """The newest cuobjdump at hand: the toolkit's, PATH's or the one in triton's bundle
    (CUDA 13's in triton 3.8, 12.8's in triton 3.6). One older than the nvcc that built the
    extension misreads its images (12.8 names an sm_90a image sm_90), so the tests then skip."""
    import shutil

    import triton

    home = _build_module().find_cuda_home()
    candidates = [Path(home, "bin", "cuobjdump") if home else None, shutil.which("cuobjdump"),
                  Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"]
    tools = [str(tool) for tool in candidates if tool and Path(tool).is_file()]
    if not tools:
        pytest.skip("no cuobjdump (neither in the CUDA toolkit, on PATH nor in triton's bundle)")
    tool = max(tools, key=_release)
    nvcc = Path(home, "bin", "nvcc") if home else None
    if nvcc and nvcc.is_file() and _release(tool) < _release(str(nvcc)):
        pytest.skip(f"cuobjdump {_release(tool)} is older than nvcc {_release(str(nvcc))}")
    return tool


@pytest.mark.parametrize("name, value", [("EI_KERNELS_CUDA_SM90", "on"),
                                         ("EI_KERNELS_CUDA_SM90_PERSISTENT", "yes"),
                                         ("EI_KERNELS_CUDA_SM90_CLUSTER", "3"),
                                         ("EI_KERNELS_CUDA_PDL", "off")])
def test_an_unknown_switch_value_is_refused_naming_the_variable(monkeypatch, name, value):
    """The extension reads an unknown value as the default; the backend refuses it before any
    kernel runs (also without a GPU or the extension), naming the variable and its values."""
    from ei_kernels.ops import cuda_mor

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"{name}='{value}': expected one of "):
        cuda_mor.check_switches()
    inp = _inputs(4, 16, 12, 1, True, True, True)
    spec = ei_kernels.MoRSpec(ranks=tuple(RANKS), scalings=tuple(SCALINGS))
    with pytest.raises(ValueError, match=name):
        cuda_mor.forward(*inp.values(), spec)


def test_every_documented_switch_value_is_accepted(monkeypatch):
    from ei_kernels.ops import cuda_mor

    for name, values in cuda_mor.SWITCHES.items():
        for value in (*values, ""):  # empty: the default, as unset
            monkeypatch.setenv(name, value)
            cuda_mor.check_switches()
        monkeypatch.delenv(name)


class TestCompiledExtension:
    pytestmark = needs_extension

    def test_loads_from_the_package(self):
        assert INFO["loaded"], INFO["reason"]
        assert INFO["reason"] is None
        assert Path(INFO["path"]).is_file()
        import ei_kernels._C  # noqa: F401  (imports torch first through the package)

    def test_holds_code_for_every_build_target(self):
        """SASS for each `NN[a]` target and PTX for each `compute_NN` one of csrc/build.py (as
        this environment sets them: CI builds with the defaults), in every CUDA source's code,
        read back with cuobjdump."""
        import subprocess

        tool = _cuobjdump()
        flags = _build_module().gencode_flags()
        want = sorted(f.rsplit("code=", 1)[1] for f in flags)
        listing = subprocess.run([tool, "--list-elf", "--list-ptx", INFO["path"]],
                                 capture_output=True, text=True, check=True).stdout
        # "ELF file 1: mor_kernels.sm_75.cubin", "PTX file 1: mor_kernels.sm_90.ptx"
        found = {}
        for line in listing.splitlines():
            if ".sm_" in line:
                source, target = line.rsplit(": ", 1)[1].rsplit(".sm_", 1)
                found.setdefault(source, []).append(
                    ("compute_" if line.endswith(".ptx") else "sm_") + target.split(".")[0])
        sources = [Path(name).stem for name in _build_module().SOURCES if name.endswith(".cu")]
        assert sorted(found) == sorted(sources), listing
        for source, targets in found.items():
            assert sorted(targets) == want, f"{source} built for other targets than {flags}?"

    def test_sass_gemms_copy_asynchronously_into_tensor_cores_and_nothing_spills(self):
        """From the built SASS: on every sm_80+ target each 16-bit portable GEMM instantiation
        loads its tiles with asynchronous copies (LDGSTS) and multiplies on tensor cores (HMMA);
        in the sm_90a image every instantiation of the Hopper GEMMs loads by TMA (UTMALDG) and
        multiplies with warp-group MMA (HGMMA) with one batch in flight, the routed forward
        with the shrink's 64x16 and 64x8 MMAs beside the 64x192 one (and its cluster's exchange
        of their partial sums through distributed shared memory) and the routed input
        gradient with g's 64x16 one and its reducer's transposed dy^T z, present whenever the build
        found CUTLASS and a 90a target, the latter letting the sum of the partials launch as
        its dependent, which waits for it (griddepcontrol) before its first load, as it waits
        for the portable GEMM before it (which lets it launch early); and no kernel
        of any target has a stack frame (ptxas spilled nothing)."""
        import re
        import subprocess

        tool = _cuobjdump()
        sass = subprocess.run([tool, "-sass", INFO["path"]], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([tool, "-res-usage", INFO["path"]], capture_output=True,
                               text=True, check=True).stdout
        frames = re.findall(r"Function (\S+):\n\s*REG:\d+ STACK:(\d+)", usage)
        assert frames and all(stack == "0" for _, stack in frames), [
            f for f in frames if f[1] != "0"]
        # "code for sm_90a" ... "Function : <mangled name>" ... instructions
        checked, hopper, sums_waiting = 0, 0, 0
        for arch, body in re.findall(r"code for (sm_\d+a?)\n(.*?)(?=\n\s*code for sm_|\Z)",
                                     sass, re.S):
            if int(re.sub(r"\D", "", arch)) < 80:
                continue
            for name, code in re.findall(r"Function : (\S+)\n(.*?)(?=Function : |\Z)", body,
                                         re.S):
                if any(kernel in name for kernel in HOPPER_KERNELS):
                    if arch == "sm_90a":  # the Hopper GEMMs: stubs in the other images
                        assert "UTMALDG" in code and "HGMMA" in code, (arch, name)
                        # the main loop keeps one batch of MMAs in flight
                        assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in code, (arch, name)
                        if "routed_gemm_kernel" in name:  # the shrink's MMAs beside the main
                            assert all(f"HGMMA.64x{n}x16.F32" in code for n in (192, 16, 8))
                            # the cluster's shrink partials: a cluster barrier at the start,
                            # arrivals on the peers' mbarriers, their staging read through
                            # distributed shared memory; the consumers' own register count
                            assert "UCGABAR_ARV" in code and "UCGABAR_WAIT" in code, name
                            assert "SYNCS.ARRIVE.TRANS64.RED.A1T0" in code, name
                            assert re.search(r"\bLD\.E ", code), name
                            assert "USETMAXREG.TRY_ALLOC" in code, name
                        if "routed_dgrad_kernel" in name:  # and g's, and the reducer's
                            assert all(f"HGMMA.64x{n}x16.F32" in code for n in (192, 16))
                            # dB's dy^T z, reading the ring's dy tiles transposed, in a warp
                            # group with its own register count
                            assert re.search(r"HGMMA\.64x16x16\.F32(\.BF16)? R\d+, "
                                             r"gdesc\[UR\d+\]\.tnspA\.tnspB", code), name
                            assert "USETMAXREG.DEALLOC" in code, name
                            assert "USETMAXREG.TRY_ALLOC" in code, name
                            # B's rows (28-byte rows: no tensor TMA) by a bulk copy into
                            # the stage (laid out there by two warps)
                            assert "UBLKCP.S.G" in code, name
                            # its dependent (the sum of the partials) may launch from its start;
                            # it waits for the u GEMM ahead of it before any global load
                            assert "PREEXIT" in code, name
                            loads = [code.find(op) for op in ("UTMALDG", "LDG", "UBLKCP")]
                            assert 0 <= code.find("ACQBULK") < min(
                                at for at in loads if at >= 0), name
                        hopper += 1
                elif "sum_splits_kernel" in name and arch == "sm_90a":
                    # which waits for it before its first global load
                    wait, load = code.find("ACQBULK"), code.find("LDG")
                    sums_waiting += 0 <= wait < load
                elif "gemm_kernel" in name and ("__half" in name or "bfloat16" in name):
                    assert "LDGSTS" in code and "HMMA" in code, (arch, name)
                    # from 9.0 on it lets a dependent (the routed input gradient) launch early
                    assert ("PREEXIT" in code) == (int(re.sub(r"\D", "", arch)) >= 90), (
                        arch, name)
                    checked += 1
        assert checked, "no 16-bit GEMM found for an sm_80+ target"
        if hopper:  # the backward's sum launches as the routed input gradient's dependent
            assert sums_waiting == 3, "sum_splits_kernel: no griddepcontrol.wait (ACQBULK)"
        expected = _build_module().sm90_gemm_skipped() is None
        assert INFO["sm90_gemm"] == expected, _build_module().sm90_gemm_skipped()
        # fp16 and bf16, each with B k-major (forward) and n-major (input gradient), and the
        # routed forward and input gradient
        assert hopper == (8 if expected else 0)

    def test_schemas(self):
        assert str(torch.ops.ei_kernels_cuda.mor_fwd.default._schema) == FWD_SCHEMA
        assert str(torch.ops.ei_kernels_cuda.mor_bwd.default._schema) == BWD_SCHEMA

    @pytest.mark.parametrize("groups, router, bypass, bias", CONFIGS)
    def test_fake_forward_shapes(self, groups, router, bypass, bias):
        logits = groups * (len(RANKS) + int(bypass)) if router else 0
        with FakeTensorMode():
            inp = _inputs(37, 100, 36, groups, router, bypass, bias, device="cuda")
            y, probs, shrink = torch.ops.ei_kernels_cuda.mor_fwd(*_fwd_args(inp, bypass, groups))
        assert (y.shape, y.dtype, y.device.type) == ((37, 36), torch.bfloat16, "cuda")
        assert (probs.shape, probs.dtype) == ((37, logits), torch.float32)
        assert (shrink.shape, shrink.dtype) == ((37, groups * sum(RANKS) + logits), torch.float32)

    @pytest.mark.parametrize("keep_shrink", [False, True], ids=["recompute-u", "kept-u"])
    @pytest.mark.parametrize("compute_dx", [True, False])
    @pytest.mark.parametrize("groups, router, bypass, bias", CONFIGS)
    def test_fake_backward_shapes(self, groups, router, bypass, bias, compute_dx, keep_shrink):
        logits = groups * (len(RANKS) + int(bypass)) if router else 0
        with FakeTensorMode():
            inp = _inputs(37, 100, 36, groups, router, bypass, bias, device="cuda")
            out = torch.ops.ei_kernels_cuda.mor_bwd(
                *_bwd_args(inp, bypass, groups, compute_dx, logits, keep_shrink)
            )
        dx, d_a, d_b, d_rw, d_rb = out
        assert dx.shape == ((37 if compute_dx else 0), 100)
        assert d_a.shape == inp["lora_a"].shape and d_b.shape == inp["lora_b"].shape
        assert d_rw.shape == (logits, 100) and d_rb.shape == (logits,)
        assert all(t.dtype == torch.bfloat16 for t in out)

    @pytest.mark.parametrize("groups, router, bypass, bias", CONFIGS)
    def test_opcheck_schema_and_fake_tensor(self, groups, router, bypass, bias):
        # On meta tensors the "real" op is the registered fake: this checks that it agrees
        # with the schema (no mutation, no aliasing) and with FakeTensor propagation.
        logits = groups * (len(RANKS) + int(bypass)) if router else 0
        inp = _inputs(5, 24, 12, groups, router, bypass, bias, device="meta")
        tests = ("test_schema", "test_faketensor")
        torch.library.opcheck(torch.ops.ei_kernels_cuda.mor_fwd.default,
                              _fwd_args(inp, bypass, groups), test_utils=tests)
        for keep_shrink in (False, True):
            torch.library.opcheck(torch.ops.ei_kernels_cuda.mor_bwd.default,
                                  _bwd_args(inp, bypass, groups, True, logits, keep_shrink),
                                  test_utils=tests)

    def test_cpu_tensors_raise_a_clear_error(self):
        inp = _inputs(4, 16, 12, 1, True, True, True)
        with pytest.raises(RuntimeError, match="mor_fwd: expected CUDA tensors, got x on cpu"):
            torch.ops.ei_kernels_cuda.mor_fwd(*_fwd_args(inp, True, 1))
        with pytest.raises(RuntimeError, match="mor_bwd: expected CUDA tensors, got x on cpu"):
            torch.ops.ei_kernels_cuda.mor_bwd(*_bwd_args(inp, True, 1, True, 4))


def _build_module():
    spec = importlib.util.spec_from_file_location("ei_cuda_build", ROOT / "csrc" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestBuildSwitches:
    def test_default_targets_are_every_architecture_since_turing_and_ptx(self, monkeypatch):
        monkeypatch.delenv("EI_KERNELS_CUDA_ARCHS", raising=False)
        assert _build_module().gencode_flags() == [
            "-gencode=arch=compute_75,code=sm_75",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_86,code=sm_86",
            "-gencode=arch=compute_89,code=sm_89",
            "-gencode=arch=compute_90a,code=sm_90a",
            "-gencode=arch=compute_90,code=compute_90",
        ]

    def test_targets_can_be_narrowed(self, monkeypatch):
        monkeypatch.setenv("EI_KERNELS_CUDA_ARCHS", "90a")
        assert _build_module().gencode_flags() == ["-gencode=arch=compute_90a,code=sm_90a"]

    def test_bad_target_names_the_variable(self, monkeypatch):
        monkeypatch.setenv("EI_KERNELS_CUDA_ARCHS", "sm90")
        with pytest.raises(ValueError, match="EI_KERNELS_CUDA_ARCHS"):
            _build_module().gencode_flags()

    def test_skip_switch_wins(self, monkeypatch):
        monkeypatch.setenv("EI_KERNELS_SKIP_CUDA_BUILD", "1")
        monkeypatch.setenv("EI_KERNELS_FORCE_CUDA_BUILD", "1")
        assert _build_module().build_decision() == (False, "EI_KERNELS_SKIP_CUDA_BUILD=1")

    def test_no_gpu_and_no_force_skips_with_a_reason(self, monkeypatch):
        monkeypatch.delenv("EI_KERNELS_SKIP_CUDA_BUILD", raising=False)
        monkeypatch.delenv("EI_KERNELS_FORCE_CUDA_BUILD", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        wanted, reason = _build_module().build_decision()
        assert not wanted and reason

    def test_warnings_are_errors_behind_a_switch(self, monkeypatch):
        monkeypatch.setenv("EI_KERNELS_CUDA_WERROR", "1")
        args = _build_module().compile_args()
        assert "-Werror" in args["cxx"]
        nvcc = args["nvcc"]
        assert nvcc[nvcc.index("-Werror") + 1] == "all-warnings"
        assert "-Werror" in nvcc[nvcc.index("-Xcompiler") + 1]

    def test_warnings_stay_warnings_by_default(self, monkeypatch):
        # A user's host compiler may warn where ours does not; the build must not fail on it.
        monkeypatch.delenv("EI_KERNELS_CUDA_WERROR", raising=False)
        args = _build_module().compile_args()
        assert not any("Werror" in flag for flag in args["cxx"] + args["nvcc"])

    def test_the_hopper_gemm_is_built_with_cutlass_headers_and_a_90a_target(self, monkeypatch,
                                                                           tmp_path):
        (tmp_path / "cute").mkdir()
        (tmp_path / "cute" / "tensor.hpp").write_text("")
        monkeypatch.setenv("EI_KERNELS_CUTLASS_DIR", str(tmp_path))
        monkeypatch.setenv("EI_KERNELS_CUDA_ARCHS", "80;90a")
        build = _build_module()
        assert build.sm90_gemm_skipped() is None
        nvcc = build.compile_args()["nvcc"]
        assert "-DEI_KERNELS_SM90A" in nvcc
        assert nvcc[nvcc.index("-isystem") + 1] == str(tmp_path)  # its warnings are not ours
        monkeypatch.setenv("EI_KERNELS_CUDA_ARCHS", "80")
        assert "90a" in build.sm90_gemm_skipped()
        assert "-DEI_KERNELS_SM90A" not in build.compile_args()["nvcc"]

    def test_a_cutlass_dir_without_headers_names_the_variable(self, monkeypatch, tmp_path):
        monkeypatch.setenv("EI_KERNELS_CUTLASS_DIR", str(tmp_path))
        with pytest.raises(ValueError, match="EI_KERNELS_CUTLASS_DIR=.*cute/tensor.hpp"):
            _build_module().sm90_gemm_skipped()
