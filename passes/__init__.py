"""slcompile.passes: FX analysis and rewriting of attention sites."""
