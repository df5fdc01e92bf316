"""Compression: quantized weights (AWQ / round-to-nearest int4, int8) and KV cache (int8 / int4).

  rtn.py         number formats and round-to-nearest
  awq.py         activation-aware scale and clip search
  calib.py       calibration tokens from the model's own code data
  linear.py      Int8Linear / Int4Linear on PyTorch's packed CPU kernels, fusion
  apply.py       which Linears are quantized; on-load `--quantize`
  checkpoint.py  quantized model directories (AutoAWQ GEMM layout for int4)
  kv.py          int8 / int4 KV-cache codes
  cli.py         `minicoder quantize`
"""
