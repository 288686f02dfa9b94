"""Datasets (LaMP, news headlines, PerLTQA, FineWeb pretraining) as ``Example``s, and the collator to model batches."""

from commer.data.example import Example

__all__ = ["Example"]
