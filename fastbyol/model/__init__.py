"""Backbone (ResNet encoder), projector/predictor heads and the online/target pair."""
