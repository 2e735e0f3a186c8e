// One slot of the progress board, copied out consistently (see ProgressBoard).
namespace EmbeddedWorker
{
    public struct BoardRow
    {
        public long Sequence, Kind, State, ProgressBp, CurrentStep, TotalSteps, DenoiseStep, DenoiseTotal;
        public long ItemsDone, ItemsFailed, ItemsTotal, EtaMs, UpdatedUnixMs, IdHash, Attempt;
        public string Status;

        public double Progress { get { return ProgressBp / 100.0; } }
    }
}
