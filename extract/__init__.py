"""Stage one: images → the 21-crop CLIP features of each (and, asked, their patch tokens and mask
targets), written once into the cache.

Holds the dataset readers, the crop pyramid, the loader, the CLIP backbone and its identity, the
prompts, the engines (torch, ONNX Runtime fp32 and int8), the extraction run, its benches and its
commands (``cli``). May import cache/ only; nothing here imports train/ or evaluate/.
"""
