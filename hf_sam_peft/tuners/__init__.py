"""tuners"""
