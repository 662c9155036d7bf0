"""Engines that implement `serve.engine.Engine`."""
