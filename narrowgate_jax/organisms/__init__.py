"""Model organisms: small VLMs of our own families trained on `data.shapes_world`, some with a
route of visual information planted by construction, so the analyses can be checked against a
known answer (`native`: Chameleon architecture; `nonnative`: LLaVA architecture; `tokens`: their
word-level tokenizers). `python -m experiments.build_organisms` trains and exports them."""
