"""Small tasks for the demo and tests: models and data generated on the fly, nothing downloaded."""
