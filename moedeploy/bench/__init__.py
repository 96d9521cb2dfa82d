"""Benchmarks behind `moedeploy bench ...`: `layer` times one MoE layer; `memory` tracks peak tensor bytes."""
