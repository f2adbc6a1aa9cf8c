"""``python -m wan_train.vae``: train a Wan-VAE from scratch (see :mod:`wan_train.vae_training`)."""

from wan_train.vae_training import main

if __name__ == "__main__":
    main()
