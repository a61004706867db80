"""Entry points. The only part of the package that may import actors/, learners/, Ray and DeepSpeed."""
