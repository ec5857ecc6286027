"""Models bigger than the machine: safetensors read tensor by tensor and written as they come
(`safetensors_io`), and quantization that holds one block in float32 at a time (`quantize`)."""
