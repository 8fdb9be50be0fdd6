"""The bottom layer: types and helpers every other package may use, depending on nothing in verl_omni.

- ``outputs``: the rollout record (``RLBatchOutput``: one engine call's group, media with a frame axis);
- ``conditioning``: the text conditioning a transformer call consumes (``Conditioning``);
- ``errors``: ``NonFiniteError`` and ``assert_finite``;
- ``dtypes``: the dtype names configs accept (``DTYPES``) and ``resolve_dtype``;
- ``checksum``: ``tensors_checksum``, the LoRA fingerprint both sides of a weight sync compute;
- ``names``: the names configs may use for engines, pipelines and the agent loop;
- ``media``: the sample convention, uint8 ``[F, H, W, 3]`` frames (an image is one frame, ``[H, W, 3]`` accepted);
- ``video_io``: videos written as MP4 (PyAV) or animated WebP / GIF (Pillow), and read back.
"""
