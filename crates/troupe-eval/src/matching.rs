//! Matching the faces found in a generated image to the subjects it should show: greedy on
//! cosine similarity, the multi-subject rule of FastComposer's evaluation (storymaker.md /
//! peers.md §2.4): repeatedly pair the most similar (subject, face) among those not yet paired.
//! A subject left without a face scores 0 (the no-face convention), and per-image scores may be
//! clamped at 0 (FastComposer's `max(·, 0)`) or kept negative.

/// What a subject's score is when its similarity is negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negative {
    /// `max(similarity, 0)` per image (FastComposer).
    Clamp,
    /// The raw cosine.
    Keep,
}

/// For each subject (row of `sims`, columns = detected faces), the face it is paired with.
/// Ties go to the lower (subject, face) index; NaN similarities never pair.
pub fn greedy_match(sims: &[Vec<f64>]) -> Vec<Option<usize>> {
    let mut pairs: Vec<(f64, usize, usize)> = sims
        .iter()
        .enumerate()
        .flat_map(|(s, row)| row.iter().enumerate().map(move |(f, &v)| (v, s, f)))
        .filter(|(v, _, _)| !v.is_nan())
        .collect();
    // Highest similarity first; equal ones in index order (a stable sort keeps it).
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let faces = sims.iter().map(Vec::len).max().unwrap_or(0);
    let (mut subject_face, mut face_taken) = (vec![None; sims.len()], vec![false; faces]);
    for (_, s, f) in pairs {
        if subject_face[s].is_none() && !face_taken[f] {
            subject_face[s] = Some(f);
            face_taken[f] = true;
        }
    }
    subject_face
}

/// Each subject's face-similarity score: its matched face's similarity (per `negative`), 0 when
/// it got no face.
pub fn subject_scores(sims: &[Vec<f64>], negative: Negative) -> Vec<f64> {
    greedy_match(sims)
        .into_iter()
        .enumerate()
        .map(|(s, face)| match face {
            None => 0.0,
            Some(f) if negative == Negative::Clamp => sims[s][f].max(0.0),
            Some(f) => sims[s][f],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_best_pair_first_not_each_subjects_best() {
        // Subject 0 prefers face 1 (0.9); subject 1 also prefers face 1 (0.95) and wins it, so
        // subject 0 takes face 0 (0.2), even though a per-subject argmax would give both face 1.
        let sims = vec![vec![0.2, 0.9, -0.4], vec![0.1, 0.95, 0.3]];
        assert_eq!(greedy_match(&sims), vec![Some(0), Some(1)]);
        assert_eq!(subject_scores(&sims, Negative::Keep), vec![0.2, 0.95]);
    }

    #[test]
    fn more_subjects_than_faces_and_negative_scores() {
        // Three subjects, one face: the most similar subject gets it; the others score 0.
        let sims = vec![vec![-0.3], vec![-0.1], vec![-0.5]];
        assert_eq!(greedy_match(&sims), vec![None, Some(0), None]);
        assert_eq!(subject_scores(&sims, Negative::Keep), vec![0.0, -0.1, 0.0]);
        assert_eq!(subject_scores(&sims, Negative::Clamp), vec![0.0, 0.0, 0.0]);
        // No face at all.
        let none: Vec<Vec<f64>> = vec![vec![], vec![]];
        assert_eq!(subject_scores(&none, Negative::Clamp), vec![0.0, 0.0]);
    }
}
