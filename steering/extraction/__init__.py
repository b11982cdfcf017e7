"""Extraction: making packs from contrastive prompts, and the cache that keeps them.

Lives here: DiM/ACE/INLP extraction and the selection of layer and position (`extract`), INLP
(`inlp`), the batched generation judge used by selection and calibration (`judge`), concept packs
(`concept`), the per-model pack cache and `ensure_pack` (`store`).
May import: `steering.evaluation`, `steering.interventions`, `steering.packs` and below.
"""
