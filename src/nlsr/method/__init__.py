"""NLSR itself: extrapolate, identify, select, transplant, realign (and SafeLoRA)."""
