"""GGUF for llama.cpp: llama.cpp's own quantizers (`ggml`), the importance matrix (`imatrix`), the model's
tensors as llama.cpp names them (`tensors`), the tokenizer (`vocab`) and the file (`writer`); `export` turns
a moebits run into a GGUF. Needs the `gguf` extra: `pip install 'moebits[gguf]'`."""
