"""Export of trained networks to TorchScript, ONNX and TensorRT, each checked for parity."""
