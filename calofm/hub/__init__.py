"""Loading and sharing: where a model is (a folder or a Hub repo), its files checked, adapters on their base,
model cards, and push/pull to the Hugging Face Hub.

    calofm.hub.resolve    folder or ``ORG/NAME[@REV]`` -> a local folder (Hub snapshot: only safetensors/JSON/YAML)
    calofm.hub.folders    model folders: config.json + model.safetensors + cards + checksums, strict loads
    calofm.hub.adapters   LoRA adapter folders on their verified base (routed or merged)
    calofm.hub.loading    load_network: the one entry point generation, adaptation and evaluation use
    calofm.hub.modelcard  model and dataset cards from the templates in hub/
    calofm.hub.push       push / pull / push_dataset
    calofm.hub.datasets   Hub dataset repos -> training files
"""
