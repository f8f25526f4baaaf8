"""``sdtune review``: a static page showing the dataset exactly as training will see it.

The page is drawn from sdtune's own code, never from a copy of its rules: buckets and crops from
:mod:`sdtune.data.buckets` and the latent cache files (:mod:`sdtune.data.latent_cache`), the caption from
:func:`sdtune.data.dataset.build_caption` and :class:`~sdtune.data.dataset.CaptionRules`' comma-part rules, the
batches from :meth:`sdtune.data.dataset.FineTuneData.epoch_batches`, token counts from the tokenizer call of
:func:`sdtune.models.text.tokenize`.

Modules: ``collect`` gathers what training would do, ``thumbs`` inspects images (thumbnail, hash, cache check) in
worker processes, ``tokens`` loads the tokenizer and finds the cut-offs, ``page`` writes the HTML (inline SVG
charts, no network), ``command`` is the CLI adapter and ``--serve``.
"""
