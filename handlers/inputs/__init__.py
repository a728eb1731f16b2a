"""What a request carries: parameters, images, tensors and v2 documents, decoded and preprocessed."""
