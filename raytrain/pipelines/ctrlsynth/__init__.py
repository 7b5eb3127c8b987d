"""CtrlSynth (spec ctrlsynth.md): decompose an image-text pair into tags, edit them with a control policy, recompose
a caption with an LLM and an image with a text-to-image stage, keep what the tagger confirms; on Ray Data."""
