"""Placeholder strings that textual inversion shares between the model (`EmbeddingManager` with
`per_image_tokens`) and the data (the personalized datasets' captions)."""

# One extra placeholder per training image (`per_image_tokens`), rare characters that the LDM BERT
# tokenizer keeps as single tokens (CLIP splits them in two, so the option needs the BERT model).
per_img_token_list = [
    "א", "ב", "ג", "ד", "ה", "ו", "ז", "ח", "ט", "י", "כ", "ל", "מ", "נ", "ס", "ע", "פ", "צ", "ק", "ר", "ש", "ת",
]
