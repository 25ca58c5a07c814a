"""Readers that turn other libraries' sparse autoencoders into SafeDIG's SparseAutoencoder, one module per
library; `safedig_core.convert.converter` drives them. Each reader returns `Imported` SAEs that encode and decode
exactly as in their source (up to float rounding where a bias or a norm had to be folded into the weights),
and refuses, in one line, anything it cannot represent exactly."""
