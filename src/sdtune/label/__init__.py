"""Auto-labeling: BLIP captions (``sdtune caption``) and WD14 tags (``sdtune tag``), one sidecar file per image.

``common`` holds what both commands share (which images to label, loading them in background threads, the closing
summary); ``tiny`` builds tiny random BLIP and WD14 models in the real on-disk layouts for tests, benchmarks and the
demo.
"""
