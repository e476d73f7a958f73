"""Pure tensor functions, one module per step of NLSR (and SafeLoRA). No I/O, no configs."""
