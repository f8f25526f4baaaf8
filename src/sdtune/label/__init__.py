"""Auto-labeling: BLIP captions (``sdtune caption``) and WD14 tags (``sdtune tag``), one sidecar file per image.

``common`` holds what both commands share (which images to label, loading them in background threads, the closing
summary). The tiny random BLIP and WD14 models the tests use live in ``tests/fixtures/labelers.py``.
"""
