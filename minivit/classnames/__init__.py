"""The ImageNet-1k and ImageNet-21k class names, in the label order of the released checkpoints.

`imagenet1k.txt` lists the 1,000 ILSVRC-2012 synsets in sorted WordNet-id order (the label order
of TFDS `imagenet2012` and of the released `imagenet21k+imagenet2012` heads); `imagenet21k.txt`
lists the 21,843 synsets of the ImageNet-21k heads (`gs://vit_models/imagenet21k/*.npz`), also
sorted by WordNet id. Each line is `<wordnet id>\t<lemmas>`; see README.md for where they come from.
"""

from __future__ import annotations

from importlib import resources

LISTS = {1000: "imagenet1k.txt", 21843: "imagenet21k.txt"}  # head width -> bundled list


def imagenet_names(num_classes: int) -> list[str] | None:
    """The bundled class names for a head of `num_classes` outputs, or None when none matches.

    Shapes: returns `num_classes` names, the first lemma of each synset ("tench", "goldfish").
    """
    if num_classes not in LISTS:
        return None
    text = resources.files(__name__).joinpath(LISTS[num_classes]).read_text(encoding="utf-8")
    return [line.split("\t", 1)[1].split(",")[0] for line in text.splitlines() if line]
