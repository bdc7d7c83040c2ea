def extract_lora(*a, **k): raise NotImplementedError
def merge_loras(*a, **k): raise NotImplementedError
