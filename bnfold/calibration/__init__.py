"""PreciseBN calibration: re-estimate BN population statistics from data with bnfold's kernels."""
