"""Tests of geoseg/gis/."""
