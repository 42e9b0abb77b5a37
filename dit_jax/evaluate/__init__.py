"""Evaluation: the ADM evaluation suite (Inception Score, FID, sFID, precision, recall) and the digits classifier.

    fid.py                FIDStatistics, compute_statistics, frechet_distance (scipy sqrtm, as ADM), fid_from_images
    inception_score.py    softmax, inception_score (5,000-sample splits, mean over splits), ..._from_logits
    precision_recall.py   ManifoldEstimator (k = 3, squared distances, float16 first), compute_prec_recall
    npz.py                ADM .npz: streamed arr_0 reader, reference statistics, write_samples_npz (np.savez layout)
    evaluator.py          Evaluator (jitted Inception sharded over the local devices), evaluate_npz
    cli.py                `dit-jax evaluate SAMPLES.npz REFERENCE.npz --inception-weights PATH`
    digits_classifier.py  accuracy of generated digits for the demo

The Inception network is dit_jax.models.inception.InceptionV3; its weights load with
dit_jax.convert.inception.load_inception_file (pytorch-fid's pt_inception-2015-12-05-6726825d.pth).
"""
