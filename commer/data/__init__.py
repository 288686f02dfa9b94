"""Datasets (LaMP, news headlines, PerLTQA, FineWeb pretraining, the recall probe) as ``commer.text.Example``s."""
