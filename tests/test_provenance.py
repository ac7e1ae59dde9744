"""The stamp on every result names the machine well enough to tell two machines apart."""

import platform

from earlyexit.provenance import cpu, machine


def test_cpu_names_the_model_and_the_widest_matrix_unit(tmp_path):
    info = tmp_path / "cpuinfo"
    block = "processor\t: {i}\nmodel name\t: Intel(R)  Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f {extra}\n\n"
    info.write_text(block.format(i=0, extra="amx_bf16 avx512_bf16") + block.format(i=1, extra=""))
    assert cpu(info) == f"Intel(R) Xeon(R) Processor ({platform.machine()}, AMX)"  # the first CPU's fields
    info.write_text(block.format(i=0, extra=""))
    assert cpu(info).endswith(", AVX-512)")
    info.write_text("processor\t: 0\n")
    assert cpu(info) == platform.machine()  # no model name, no known unit: the architecture alone
    assert cpu(tmp_path / "missing") == platform.machine()
    assert " threads, torch " in machine()
