"""Vector quantisation (van den Oord et al. 2017; Esser et al. 2021)."""
