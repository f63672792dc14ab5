"""Dense bf16 peak TFLOP/s per accelerator chip (vendor figures), shared by
the benchmarks. Matched on `device_kind` substrings, in order."""

PEAKS_TFLOPS = (
    ('H100 PCIe', 756.0), ('H100', 989.0), ('H200', 989.0), ('GH200', 989.0),
    ('A100', 312.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0),
    ('TPU v5p', 459.0), ('TPU v5', 459.0), ('TPU v6 lite', 918.0),
    ('TPU v6e', 918.0), ('TPU v4', 275.0),
)

# One chip of each kind a paper-scale run is likely to use (demand tables).
DEMAND_CHIPS = ('H100', 'H200', 'A100', 'TPU v5e', 'TPU v5p', 'TPU v6e')


def peak_of(device_kind: str) -> float | None:
  for key, peak in PEAKS_TFLOPS:
    if key.lower() in device_kind.lower():
      return peak
  return None
