"""One module per trainer, each thin over its TRL trainer; `posttrain.registry` lists them."""
