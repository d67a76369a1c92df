"""Numbers a mapping team can report: stratified reference samples of a class map, and accuracy and area
estimates with confidence intervals from them (Olofsson et al. 2014, Remote Sensing of Environment 148).

The step after the map: ``geoseg sample`` draws a stratified random sample of points from a class map
(:func:`sample_points`), interpreters label them, and ``geoseg assess`` estimates the map's accuracy and each
class's area with 95 % confidence intervals from them (:func:`assess`). One module per step:

* :mod:`.estimate`: the paper's estimators, sample size (eq. 13) and allocations, in plain numpy;
* :mod:`.strata`: a class map's classes, exact pixel counts and ground areas, read in windows;
* :mod:`.sample`: streamed stratified random sampling, points written for interpretation;
* :mod:`.assessment`: points against the map, the estimates, and the JSON, Markdown, CSV and PNG reports.
"""

from __future__ import annotations

from geoseg.assess.assessment import AssessmentResult, SkippedPoint, assess
from geoseg.assess.estimate import ALLOCATIONS, Estimate, allocate, sample_size, stratified_estimate
from geoseg.assess.sample import SampleResult, Stratum, sample_points
from geoseg.assess.strata import MapStrata, read_strata

__all__ = ["ALLOCATIONS", "AssessmentResult", "Estimate", "MapStrata", "SampleResult", "SkippedPoint", "Stratum",
           "allocate", "assess", "read_strata", "sample_points", "sample_size", "stratified_estimate"]
