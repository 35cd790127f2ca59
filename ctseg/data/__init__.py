"""TotalSegmentator data: dataset layout, label merging, phantoms, transforms and DataModules."""
