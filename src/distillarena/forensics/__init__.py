"""Forensics: was a model distilled from a watermarked teacher? Watermark detectors for texts and for suspect models
(open weights or an API), with exact p-values over de-duplicated (window, token) pairs."""

from distillarena.forensics.detect import Detection, detect_api, detect_open, detect_text, encode_texts

__all__ = ["Detection", "detect_api", "detect_open", "detect_text", "encode_texts"]
