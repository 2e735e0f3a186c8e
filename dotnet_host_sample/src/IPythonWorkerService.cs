// The shape ServiceProcessing already calls: one method, a worker type, a
// command and a request. Registering EmbeddedProcessingWorker for this
// interface instead of the out-of-process client is the one-line switch.
using System.Threading.Tasks;

namespace EmbeddedWorkerHost
{
    public enum PythonWorkerType
    {
        Processing,
        Device,
        Model,
        Inference,
        Postprocessing,
    }

    public interface IPythonWorkerService
    {
        /// <summary>Run `command` (optionally domain-prefixed) with `request`; the reply envelope.</summary>
        Task<Reply> ExecuteAsync(PythonWorkerType workerType, string command, object request);

        /// <summary>The same with a JSON request and a JSON reply, for hosts that already hold JSON.</summary>
        Task<string> ExecuteJsonAsync(PythonWorkerType workerType, string command, string requestJson);
    }
}
