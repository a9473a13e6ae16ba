"""The lab done right, usable as a library: data, model, training, plots, offline datasets, specs."""
