"""Evaluation as TotalSegmentator reports it: per-class Dice and normalised surface distance."""
